"""The plan stage: survey → select → calibrate → candidates → choose → assemble, and apply."""
