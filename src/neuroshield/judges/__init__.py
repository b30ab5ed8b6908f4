"""Judges: what a model's response (or, for the logprob judge, its prompt) says about refusal.

* `judges.result`: `JudgeResult`, the verdict type every judge returns.
* `judges.phrase`: `RefusalPhraseJudge`, the default rule-based judge.
* `judges.logprob`: `LogprobRefusalJudge` and `refusal_score`, refusal vs compliance openers without generation.
* `judges.classifier`: `ClassifierJudge`, a local sequence classifier or guard model.
* `judges.registry`: `get_judge(name, loaded)`, the one way to get a judge by name, and the helpers that
  record which judge produced a number (`judge_info`, `judge_label`) and call it (`judge_responses`).
"""
