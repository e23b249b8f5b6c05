"""The spill hierarchy: device pool (G1), host memory (G2), local disk (G3) and a pod-shared tier (ICMS)."""
