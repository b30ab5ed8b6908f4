"""Running a model on prompts: batched generation and teacher-forced scoring (`generate.generation`).

Evaluation, validation, training (self-generated retain answers) and the experiments all generate
through this one path, and cache answers in the one generation cache (`generate.cache`).
"""
