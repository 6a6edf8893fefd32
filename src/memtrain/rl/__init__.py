"""GRPO for the joint end-to-end + intermediate-recall objective."""
