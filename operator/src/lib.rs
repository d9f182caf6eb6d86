//! partnergate operator.
