public enum PFarmgateIngest {}
