// Log Analytics workspace (platform logs, diagnostic settings) and a
// workspace-based Application Insights (rtpd's traces, logs and metrics).
//
// Application Insights keeps local (instrumentation key) ingestion on: the
// Container Apps OpenTelemetry agent can only send with the connection string.

param location string
param logAnalyticsName string
param appInsightsName string
param logRetentionDays int

resource logs 'Microsoft.OperationalInsights/workspaces@2025-07-01' = {
  name: logAnalyticsName
  location: location
  properties: {
    sku: {
      name: 'PerGB2018'
    }
    retentionInDays: logRetentionDays
  }
}

resource appInsights 'Microsoft.Insights/components@2020-02-02' = {
  name: appInsightsName
  location: location
  kind: 'web'
  properties: {
    Application_Type: 'web'
    WorkspaceResourceId: logs.id
    IngestionMode: 'LogAnalytics'
    RetentionInDays: logRetentionDays
    DisableLocalAuth: false
  }
}

output logAnalyticsId string = logs.id
output logAnalyticsName string = logs.name
output appInsightsId string = appInsights.id
output appInsightsName string = appInsights.name
// Not a secret (it identifies where to send, it does not authorize reading),
// but it does let anyone send telemetry there.
output appInsightsConnectionString string = appInsights.properties.ConnectionString
