"""Judges: what a model's response (or, for the logprob judge, its prompt) says about refusal.

* `judges.result`: `JudgeResult`, the verdict type every judge returns.
* `judges.phrase`: `RefusalPhraseJudge`, the default rule-based judge.
* `judges.logprob`: `LogprobRefusalJudge` and `refusal_score`, refusal vs compliance openers without generation.
* `judges.classifier`: `ClassifierJudge`, a local sequence classifier or guard model.
* `judges.learned`: `LearnedJudge` (`learned`), a logistic head on the default model's reading of (prompt,
  response), trained on the dev part of the labelled set (`scripts/train_judge.py`).
* `judges.registry`: `get_judge(name, loaded)`, the one way to get a judge by name, and the helpers that
  record which judge produced a number (`judge_info`, `judge_label`) and call it (`judge_responses`).
"""
