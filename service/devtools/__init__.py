"""Development tools, never on the runtime path: TikTok sandbox, local broker, sample traffic, the demo."""
