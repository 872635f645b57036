// The pipeline's golden signals as an Azure Monitor workbook (bicep/workbook.json):
// traffic, errors, latency and saturation of ingest, queue and downstream, and
// a "find a payment" box. Linked to Application Insights; its queries use the
// classic Application Insights tables (requests, dependencies, traces,
// customMetrics) and, for Service Bus, the workspace's AzureMetrics.

param location string
param displayName string
param appInsightsId string

@description('Log Analytics workspace with the Service Bus metrics (diagnostic settings).')
param logAnalyticsId string

// workbook.json names its resources with placeholders filled in here.
var serializedData = replace(replace(loadTextContent('../workbook.json'), '__APP_INSIGHTS_ID__', appInsightsId), '__LOG_ANALYTICS_ID__', logAnalyticsId)

resource workbook 'Microsoft.Insights/workbooks@2023-06-01' = {
  // A workbook's name must be a GUID; this one is stable per resource group.
  name: guid(resourceGroup().id, 'rtpd-pipeline-workbook')
  location: location
  kind: 'shared'
  properties: {
    displayName: displayName
    category: 'workbook'
    sourceId: appInsightsId
    version: 'Notebook/1.0'
    serializedData: serializedData
  }
}

output workbookId string = workbook.id
