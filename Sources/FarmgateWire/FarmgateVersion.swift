/// The version both programs report.
public enum FarmgateVersion {
    public static let current = "0.1.0"
}
