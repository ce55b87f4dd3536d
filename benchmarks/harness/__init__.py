"""What every benchmark shares: how quiet the machine was while it measured (:mod:`.quiet`)."""
