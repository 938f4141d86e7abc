"""Running on many devices: meshes, logical-axis rules (issue 19)."""
