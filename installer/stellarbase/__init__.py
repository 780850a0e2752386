"""StellarBase bare-host installer and supervisor."""

__version__ = "0.1.0"
