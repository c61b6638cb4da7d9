"""TikTok Business API: request bodies, answer classification, and the HTTP client edge."""
