"""The training methods' names, shared by the config, the planner and the dashboard (torch-free)."""

# every train.method, the default first
METHODS = ("sft", "dpo", "orpo", "grpo")
# rows are pairs of replies whose chosen and rejected sides run through the model together
PREFERENCE_METHODS = ("dpo", "orpo")
# trained on prompts and the model's own completions (generated before each update), scored by rewards
RL_METHODS = ("grpo",)
