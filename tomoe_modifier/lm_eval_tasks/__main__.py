"""Print the lm-eval ``--include_path`` of the tomoe_* tasks.

    lm_eval ... --include_path "$(python -m tomoe_modifier.lm_eval_tasks | tail -n 1)"

(``tail -n 1``: importing the package makes llm-compressor warn on stdout.)
"""

from tomoe_modifier.lm_eval_tasks import include_path

print(include_path())
