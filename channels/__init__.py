"""Channel adapters: one small interface and one module per kind of provider. The engine's lowest layer of I/O.

    base      the Channel interface every adapter implements, and its values (OutgoingMessage, SendResult, ...)
    pacing    token bucket, concurrent paced sending and answer classification for the provider adapters
    sms       GSM-7 / UCS-2 encoding and segment counting (what an SMS costs)
    local     console and outbox-file channels (no credentials)
    twilio    Twilio Programmable Messaging through the official ``twilio`` client
    sendgrid  SendGrid mail/send through the official ``sendgrid`` client

May import: the standard library and the provider client libraries. Never the engine: the engine builds
adapters from config.yaml (engine.providers) and talks to them only through channels.base.Channel.
"""
