//! Rules that judge one concern of a host, shared by doctor and provision.
