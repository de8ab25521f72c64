"""Partner-site deployment: TLS and node keys (keys.py), site readiness checks (site_check.py)."""
