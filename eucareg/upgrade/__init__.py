"""Upgrading an Ubuntu 9.10/10.04 (Eucalyptus 1.6.2) cloud to eucareg: read what the old
front end registered (sources.py, keys.py), plan the import against the registry (plan.py),
and stop the old registration jobs (jobs.py). `eucareg import` (cli/importing.py) drives it.
"""
