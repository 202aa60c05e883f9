"""NVFlare project.yml templates, medsilo provisioning builders and site preflight checks. Lands with
the provisioning issue."""
