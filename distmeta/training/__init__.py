"""Training shared by both personalization paths: the supervised loop (`fit`), the one Ray Train launcher
(`launcher`) and trained models as cached artifacts (`artifacts`)."""
