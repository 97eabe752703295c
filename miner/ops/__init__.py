"""Operations: metrics, the health server, systemd notification, logs."""
