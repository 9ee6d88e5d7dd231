"""The tiny kit (`python -m rpo.tiny KIND OUT`): tiny random models of the real classes and small
datasets in the real on-disk layouts, for tests and the offline demo. `pipelines` (SD1.5, SDXL,
experts, prompts), `datasets` (Pick-a-Pic, HPDv2), `scorers` (the six metrics' weights)."""
