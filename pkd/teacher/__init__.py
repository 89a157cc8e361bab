"""Stage 1 input: prompts, the D_w/D_p/D_s split, and reading teacher samples."""
