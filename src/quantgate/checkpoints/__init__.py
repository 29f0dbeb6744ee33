"""Checkpoints: obtain (convert, build, download, local) into a content-addressed cache."""
