//! PartnerConnector custom resource types.
