"""`eucareg backup` and `eucareg restore`: everything that makes a registrar host the registrar it
is (registry, cloud CA, identity keys, secrets), in one checked and optionally encrypted file.
docs/backup.md lists what is kept and why.
"""
