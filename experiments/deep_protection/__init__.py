"""Kulkarni & Ambati, "Deep Protection" (Deep Image Prior restoration before the victim): its fixed,
automatic and oracle stops compared on the main job's SynthParts models."""
