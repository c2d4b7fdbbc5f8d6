"""fedcollm_secure."""
