"""Broker domain: release pipeline (``node_flow``), tenant/operator actions (``admin``), the
records (``model``), typed errors (``errors``), injected clock and randomness (``clock``) and
the revocation hub (``revocations``). Imports neither grpc nor pkcs11."""
