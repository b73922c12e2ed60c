"""mandate: runtime identity and purpose-bound authorization for AI agents (Envoy ext_authz)."""

__version__ = "0.1.0"
