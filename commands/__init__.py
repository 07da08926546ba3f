"""What every script's commands share above the store and the remote: running a command (audit, metrics,
recovery time objectives, push after backup) and the store and remote subcommands."""
