"""The registry's Alembic migrations: env.py, the revisions in versions/, and the frozen 0.1.0
schema they start from (v010.py). Run through eucareg/store/upgrade.py, never by hand.
"""
