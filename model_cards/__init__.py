"""Model card templates (Jinja + Markdown), installed as the `dlm_model_cards` package for `dlm push`."""
