"""Key broker: HSM-backed gRPC service that releases sealed dataset key shares.

Public entry points (imported from their modules so that the domain never pulls in grpc):

- ``kms_broker.client.KeyClient``: the node-side key client (challenge, attest, release from
  every broker, open, derive the DEK, renew, watch revocations).
- ``kms_broker.tenant``: ``TenantClient``, ``upload_dataset``, ``create_tenant_key``,
  ``load_tenant_key``.
- ``kms_broker.grants``: ``GrantDocument``, ``sign_grant``, ``verify_grant``.
- ``kms_broker.rpc``: ``BrokerEndpoint`` and the typed client errors.
- ``kms_broker.node_enrol.enrol_node``: operator-side TPM enrolment (``kms-broker node enrol``):
  EK certificate, MakeCredential/ActivateCredential at every broker.
- ``kms_broker.app.build_server`` / ``kms-broker serve``: the server's composition root.
- ``kms_broker.domain``: the release pipeline, admin actions and node enrolment
  (``domain.enrolment.NodeEnrolment``) (no grpc, no pkcs11).
- ``kms_broker.audit``: the hash-chained audit log and its verifier.
"""
