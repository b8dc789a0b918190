"""The fleet's PKI: the CA, certificates, the registry of issued certificates, revocation."""
