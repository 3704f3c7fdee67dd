"""procdata."""
