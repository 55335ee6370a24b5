"""The related papers' methods: compute-matched planning, multi-model rounds, synthesis, influence."""
