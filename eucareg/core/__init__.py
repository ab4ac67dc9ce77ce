"""The pure core: vocabulary, TXT codec, trust rules, the policy and its transitions.

Standard library only, no I/O and no clock: every value in, a decision out.
"""
