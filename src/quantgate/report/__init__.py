"""Reports: score tables (markdown, snapshot-ready) and their syrupy extension."""
