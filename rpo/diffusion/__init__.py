"""The method's math: per-sample schedulers, rollouts, the replay buffer, the ranking loss and
one loss evaluation (`objective`)."""
