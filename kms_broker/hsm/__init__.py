"""HSM backends for the key broker.

The protocol and errors live in :mod:`kms_broker.hsm.interface` (re-exported here). Backends are
imported from their modules so that domain code never pulls in python-pkcs11:
``kms_broker.hsm.pkcs11_hsm.Pkcs11Hsm`` (PKCS#11; SoftHSM2), ``kms_broker.hsm.fake.FakeHsm``
(tests), and ``kms_broker.hsm.softhsm`` for SoftHSM token setup.
"""

from kms_broker.hsm.interface import Hsm, HsmError, HsmUnavailable, KeyNotFound, UnwrapFailed

__all__ = ["Hsm", "HsmError", "HsmUnavailable", "KeyNotFound", "UnwrapFailed"]
