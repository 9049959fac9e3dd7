"""Device profiles shipped with perfsim (one YAML file per device)."""
