"""The fast.ai lesson-2 recipe as a library: the stages in `stages/` call into it."""
