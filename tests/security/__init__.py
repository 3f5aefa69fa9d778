"""The attack suite: untrusted inputs against the trust model of docs/security.md."""
