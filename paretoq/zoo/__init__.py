"""The bundled demo MoE and how it was trained."""
