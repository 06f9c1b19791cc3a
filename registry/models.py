"""Base models, variants, measurements, planning runs and releases live here."""
