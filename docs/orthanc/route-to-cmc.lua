-- Orthanc: send the CT and MR series of every stable study to the cmc node (the modality
-- named "cmc" in DicomModalities), unless cmc already segmented the study.
function OnStableStudy(studyId, tags, metadata)
  local images = {}
  for _, seriesId in pairs(ParseJson(RestApiGet('/studies/' .. studyId))['Series']) do
    local series = ParseJson(RestApiGet('/series/' .. seriesId))['MainDicomTags']
    if series['Modality'] == 'SEG' and series['SeriesDescription'] == 'CMC segmentation' then
      return
    end
    if series['Modality'] == 'CT' or series['Modality'] == 'MR' then
      table.insert(images, seriesId)
    end
  end
  if #images > 0 then  -- one asynchronous C-STORE job (see Orthanc's Jobs page)
    RestApiPost('/modalities/cmc/store',
                DumpJson({Resources = images, Synchronous = false}, true))
  end
end
