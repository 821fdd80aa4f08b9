"""hsm-domain's shared library: data model, canonical encoding, quorum rules, transitions,
sealing, chain verification, identities, PKI and errors. Pure code with no I/O of its own
beyond reading and writing the key files it is asked to."""
