"""fxprune's built-in scoring passes (installed as ``fxprune.passes``; registered as entry points)."""
