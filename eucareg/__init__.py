"""eucareg: automatic, checked registration of Eucalyptus-style cloud components over mDNS."""

__version__ = "0.1.0"
