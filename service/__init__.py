"""tiktok-audience-sync: keep TikTok Custom Audiences in sync with audience-membership events on Kafka."""

__version__ = "0.1.0"
