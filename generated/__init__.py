"""Generated optimizer modules, one per spec in specs/ (written by `optgen build specs/*.yaml`)."""
